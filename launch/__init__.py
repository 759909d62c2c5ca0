"""Entry points that compose configs with Hydra: compose -> validate -> freeze -> run here or submit."""
