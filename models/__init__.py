"""One file per method: its prior, likelihood and guide. `--model NAME` picks `models/NAME.py`
(installed as `bayesprompt.models.NAME`)."""
