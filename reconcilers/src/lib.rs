//! The controllers of example-operator, one module per controller.
//!
//! Reconcilers are level-triggered and idempotent; they write only when the cluster differs
//! from the desired state.
