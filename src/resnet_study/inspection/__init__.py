"""Inside one trained model: hooks, statistics, Grad-CAM and figures (`probes`)."""
