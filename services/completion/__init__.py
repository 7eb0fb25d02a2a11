"""Completion tracker: publishes CampaignCompleted once every hydrated recipient is terminal."""
