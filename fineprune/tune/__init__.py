"""Fine-tuning: the recipe, the loop, its methods and the averaged runs."""
