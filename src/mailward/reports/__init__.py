"""Reports mailward sends about mail it handled: delivery status notifications and TLS reports."""
