"""Pipeline steps: plain functions and the thin Prefect tasks that wrap them."""
