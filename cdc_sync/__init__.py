"""cdc-sync: keeps EngageLab MA contact information in step with an application's user table."""

__version__ = "0.1.0"
