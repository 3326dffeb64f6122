"""The delivery path: one message from the consume loop to its ack."""
