"""Pure data and ML functions: no Dagster imports here, so each piece is testable alone."""
