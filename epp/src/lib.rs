//! Pure endpoint-picking domain: metrics parsing, request parsing, model rules, scheduling (no I/O).
