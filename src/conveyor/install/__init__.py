"""conveyor in its own cluster: its Helm chart, `conveyor bootstrap` and `conveyor uninstall`."""
