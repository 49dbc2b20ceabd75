"""Alert lifecycle (pure) and, later, subscriptions and delivery."""
