"""Qt dock widgets. Each is thin over the headless modules it drives."""
