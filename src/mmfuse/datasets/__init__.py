"""Generators of the built-in data sets, written to a folder of images and JSONL records that `mmfuse train` reads.

- `relations`: VQA about several objects (spatial relations, counting, attribute binding); docs/relations.md.
- `glyphs`: VQA about one rotated, cluttered digit, where frozen ImageNet features are weak; docs/finetune.md.

Generate from the command line with `mmfuse data relations --out DIR` or `mmfuse data glyphs --out DIR`. Nothing
here prints: the generators return what they wrote and the CLI reports it. Importing this package imports no
generator (each needs PIL; `relations` also the data layer's `DataError`).
"""
