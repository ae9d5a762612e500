//! Pure LoRA-sync domain: config schema, validation and reconcile planning (no I/O).
