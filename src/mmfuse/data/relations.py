"""Deprecated alias: `python -m mmfuse.data.relations ARGS` runs `mmfuse data relations ARGS` (mmfuse.datasets)."""

if __name__ == "__main__":
    import sys

    from mmfuse.cli import main

    sys.exit(main(["data", "relations", *sys.argv[1:]]))
