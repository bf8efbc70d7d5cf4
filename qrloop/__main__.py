from qrloop.cli.main import app

app()
