from qrloop.cli import app

app()
