"""The Letterpress domain: settings, database, job state machine, storage, presets, model loading.

`api` and `worker` import `common`; they never import each other.
"""
