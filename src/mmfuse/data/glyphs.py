"""Deprecated alias: `python -m mmfuse.data.glyphs ARGS` runs `mmfuse data glyphs ARGS` (mmfuse.datasets)."""

if __name__ == "__main__":
    import sys

    from mmfuse.cli import main

    sys.exit(main(["data", "glyphs", *sys.argv[1:]]))
