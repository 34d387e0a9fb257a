import sys

from spoold.cli import main

if __name__ == "__main__":  # vLLM's engine processes re-import the main module
    sys.exit(main())
