"""Write services (catalog, customers, orders): validate a command, change the service's
tables and append the resulting events to the event log in one PostgreSQL transaction."""
