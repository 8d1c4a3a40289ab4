"""Sensor ingest: turns a source (simulated turbine, CSV replay, MQTT topic) into paced, sequenced
multichannel batches on ``sensors/<asset>/raw``.

The signal model (:mod:`.simulator`), the CSV reader (:mod:`.replay`), the pacing rule
(:mod:`.pacing`) and the batch assembly (:mod:`.batch`) are pure and tested without processes;
:mod:`.service` is the only module that talks to the bus.
"""
