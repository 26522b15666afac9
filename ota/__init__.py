"""OTA: bundle format and verification (signatures, transfer and the update state machine come with the OTA issue)."""
