"""Capacity planning: the SLO syntax, profiles of what one rank serves, and the plan for a load
(shared/planner/README.md)."""
