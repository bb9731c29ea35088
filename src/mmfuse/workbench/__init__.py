"""The fusion workbench: stress a finished run (`stress`, `corrupt`, `robustness`).

Nothing is imported here, so `import mmfuse.workbench.corrupt` stays light (no Lightning).
"""
