from streamfuse.cli import main

main()
