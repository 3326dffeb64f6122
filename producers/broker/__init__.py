"""The AMQP connection and the one confirmed-publish path (aiormq behind one adapter)."""
