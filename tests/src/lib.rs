//! End-to-end test support: the control plane harness and process helpers.
