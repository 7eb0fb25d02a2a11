"""Command handler: campaign.commands -> campaign.events."""
