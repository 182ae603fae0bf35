"""`python -m d3codec` is the same as the `d3codec` command."""
from d3codec.cli import main

if __name__ == "__main__":
    main()
