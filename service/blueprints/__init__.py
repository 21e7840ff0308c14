"""The service's endpoints, one blueprint per area: prediction, health and metrics, documentation and UI."""
