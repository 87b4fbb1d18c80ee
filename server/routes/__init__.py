"""HTTP routes; each module owns one API surface."""
