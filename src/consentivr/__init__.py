"""consentivr: GDPR consent for recorded calls on a self-hosted Asterisk PBX."""

__version__ = "0.1.0"
