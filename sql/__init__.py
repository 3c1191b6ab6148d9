"""conveyor's SQL: numbered migrations, the protocol's named queries and the schema dump."""
