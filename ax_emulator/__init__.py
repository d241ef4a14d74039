"""The virtual AX-M1 card: an emulator of the card's runner programs."""
