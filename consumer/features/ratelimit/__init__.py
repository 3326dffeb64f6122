"""Rate limits: the chain layer (``layer``) and the limiters it asks (``limiters``)."""
