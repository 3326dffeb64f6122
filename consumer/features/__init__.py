"""What plugs into the chain: cancellation, rate limits, resources, tracing, schedules."""
