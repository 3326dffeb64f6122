"""Process start-up and supervision: what runs beside the consume loop."""
