from leveret.consumer.cli import main

main()
