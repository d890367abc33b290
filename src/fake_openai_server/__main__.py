from fake_openai_server.cli import main

main()
