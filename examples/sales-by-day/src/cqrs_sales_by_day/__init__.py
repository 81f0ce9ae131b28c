"""`sales-by-day`: per UTC calendar day of placement, the count and revenue of the day's
non-cancelled orders. A plugin projection for cqrs-projector (see README.md)."""
