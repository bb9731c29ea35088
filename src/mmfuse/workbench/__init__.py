"""The fusion workbench: compare (`compare`), stress (`stress`, `corrupt`, `robustness`) and explain (`explain`).

Nothing is imported here, so `import mmfuse.workbench.corrupt` stays light (no Lightning).
"""
