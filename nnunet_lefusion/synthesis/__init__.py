"""One synthetic case from one real case: the interface and its implementations (copy-paste, LeFusion)."""
