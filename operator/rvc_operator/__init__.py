"""rvc_operator: kopf controller for RVCExperiment resources."""
