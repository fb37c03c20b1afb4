from fedlm.experiment.report import report_main, write_report
from fedlm.experiment.runner import TriadConfig, experiment_main, run_experiment

__all__ = ["TriadConfig", "experiment_main", "report_main", "run_experiment", "write_report"]
