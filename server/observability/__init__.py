"""What the server tells its operators: Prometheus metrics, NVML GPU readings, log lines."""
