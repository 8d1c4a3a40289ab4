from components.anomaly_detector.service import main
from ipc import run_component

run_component(main)
