"""Economics: the cost and theoretical-revenue arithmetic, and the report built from the services'
metrics."""
