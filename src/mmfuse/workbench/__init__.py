"""The fusion workbench: compare, stress-test and explain fusions on your own data."""
