//! Queries for reports and comparisons (owned by the report module's author).
