"""Pure cores shared by the model builder and the anomaly detector.

Nothing here imports scikit-learn or the nucleus: the detector process loads these modules and must
stay small (no scikit-learn) and obey the dependency rule (components -> ipc only).
"""
