"""Monitor: rolling KPIs, detectors, rollback policy, and the faust app that runs them."""
